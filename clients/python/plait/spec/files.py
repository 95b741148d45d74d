"""YAML workflow files (SDK layer: plait.spec).

:func:`load_workflow` reads a file and :func:`loads_workflow` parses text; both go through the
converter of :mod:`plait.spec.convert`, so errors name the file, the action and the field. YAML
is read with a safe loader that also refuses a key repeated in one mapping, and that is bounded
so a small hostile file cannot take the CLI's memory or time: at most :data:`MAX_YAML_BYTES`
bytes, :data:`MAX_YAML_DEPTH` levels of nesting, and aliases that expand to at most
:data:`MAX_YAML_ALIAS_NODES` nodes in all (a "billion laughs" file of nested aliases fails while
it is being read, naming the file and the limit).
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from plait.errors import FieldViolation
from plait.spec import fastyaml
from plait.spec.convert import SpecError, build_spec
from plait.spec.params import apply_params
from plait.v1 import workflow_pb2

__all__ = [
    "MAX_YAML_ALIAS_NODES",
    "MAX_YAML_BYTES",
    "MAX_YAML_DEPTH",
    "WORKFLOW_DIR_ENV",
    "load_params_file",
    "load_workflow",
    "loads_workflow",
]

# Given to every exec action of a file loaded by load_workflow (unless the file sets it), so a
# flow can run scripts kept beside it when its workers share the filesystem (as `plait run`'s
# do). It goes in the workflow's env, sent once: the coordinator adds it to each exec lease.
WORKFLOW_DIR_ENV = "PLAIT_WORKFLOW_DIR"


# A workflow file's size; the coordinator refuses a spec over its message limit (4 MiB by
# default) anyway, and YAML is rarely more than a few times larger than the spec it describes.
MAX_YAML_BYTES = 16 * 1024 * 1024
# Nesting of collections: a workflow needs about ten, plus what an `input:` value nests (the
# coordinator allows 64 levels of JSON there). Bounded well inside Python's recursion limit.
MAX_YAML_DEPTH = 100
# Nodes that aliases add, each alias counted as a copy of everything it names (which is what
# the converter walks): generous for `<<: *defaults` on every action of a big generated file,
# and a nested-alias bomb hits it after a few hundred events.
MAX_YAML_ALIAS_NODES = 1_000_000


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a key repeated in one mapping instead of keeping the last,
    and bounds nesting and alias expansion while it composes (before anything is built)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._alias_nodes = 0
        # id(node) -> its size with every alias under it expanded. Nodes stay referenced by the
        # document while it loads, so ids are stable; a node still being composed has no entry.
        self._sizes: dict[int, int] = {}

    def _mark(self) -> yaml.Mark:
        return self.peek_event().start_mark  # type: ignore[no-untyped-call,no-any-return]

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        """Composes one node, counting what aliases expand to and how deep collections go."""
        if self.check_event(yaml.AliasEvent):
            mark = self._mark()
            node = super().compose_node(parent, index)
            size = self._sizes.get(id(node))
            if size is None:
                raise yaml.composer.ComposerError(
                    None, None, "an alias inside the node it names (a recursive alias)", mark
                )
            self._alias_nodes += size
            if self._alias_nodes > MAX_YAML_ALIAS_NODES:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"aliases expand to more than {MAX_YAML_ALIAS_NODES:,} nodes, the limit"
                    " for a workflow file (nested aliases?)",
                    mark,
                )
            return node
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(
                None,
                None,
                f"nested more than {MAX_YAML_DEPTH} levels deep, the limit",
                self._mark(),
            )
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        sizes = self._sizes
        if isinstance(node, yaml.ScalarNode):
            sizes[id(node)] = 1
        elif isinstance(node, yaml.SequenceNode):
            sizes[id(node)] = 1 + sum([sizes[id(child)] for child in node.value])
        elif isinstance(node, yaml.MappingNode):
            sizes[id(node)] = 1 + sum([sizes[id(k)] + sizes[id(v)] for k, v in node.value])
        return node


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *anchor` keys may be overridden; only literal repeats are mistakes
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice in one mapping", mark
            )
        seen.add(key)
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pauses Python's cyclic garbage collector (if it runs) for the block; on resuming,
    moves what the block made to the oldest generation (two list splices) rather than have
    the next young collection walk it all."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.freeze()
            gc.unfreeze()
            gc.enable()


def _parse(text: str) -> Any:
    """The YAML document, with the same values and bounds whichever way it is read: a JSON
    document (JSON is YAML) by the JSON parser when that reading is certainly the same, else
    through libyaml when PyYAML has it, else the pure-Python safe loader above
    (plait.spec.fastyaml; for 100,000 actions about 0.05 s, 1 s and 30 s)."""
    if text.lstrip()[:1] in ("{", "["):  # JSON is YAML; a generated file often is JSON
        doc = fastyaml.load_json(text, max_depth=MAX_YAML_DEPTH)
        if doc is not fastyaml.NOT_JSON:
            return doc
    if fastyaml.AVAILABLE:
        return fastyaml.load(text, max_depth=MAX_YAML_DEPTH, max_alias_nodes=MAX_YAML_ALIAS_NODES)
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass


def _too_big(source: str, unit: str) -> SpecError:
    why = f"is more than {MAX_YAML_BYTES:,} {unit}, the limit for a workflow file"
    return SpecError(source, [(FieldViolation("", why), why)])


def loads_workflow(
    text: str,
    *,
    source: str = "<string>",
    workflow_dir: str | None = None,
    params: Mapping[str, Any] | None = None,
    param_sources: Mapping[str, str] | None = None,
) -> workflow_pb2.WorkflowSpec:
    """Parses YAML text as a workflow; ``source`` names it in errors.

    ``params`` are the values of the parameters the text declares (``${params.NAME}``; see
    :mod:`plait.spec.params`), ``param_sources`` how errors name where each came from.

    When ``workflow_dir`` is given it becomes ``$PLAIT_WORKFLOW_DIR`` in the workflow's ``env``
    (unless the document's ``env`` sets it), which every exec action gets beneath its own.
    """
    if len(text) > MAX_YAML_BYTES:
        raise _too_big(source, "characters")
    # The document is a tree (no cycles to collect): without the pause, a 100,000-action file's
    # million objects made the cyclic collector rescan everything again and again (4x slower).
    with collector_paused():
        try:
            doc = _parse(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise SpecError(
                source, [(FieldViolation("", f"{at}{problem}"), f"invalid YAML: {at}{problem}")]
            ) from None
        default_name = Path(source).stem or "workflow"
        doc = apply_params(doc, source, params, sources=param_sources, text=text)
        spec = build_spec(doc, source, default_name)
    if workflow_dir is not None and WORKFLOW_DIR_ENV not in spec.env:
        # Once, in the workflow's env (which the coordinator adds beneath each exec action's own
        # as it leases it), not in every action: 56 bytes x 100,000 actions passed 4 MiB.
        spec.env[WORKFLOW_DIR_ENV] = workflow_dir
    return spec


def load_workflow(
    path: str | os.PathLike[str],
    *,
    params: Mapping[str, Any] | None = None,
    param_sources: Mapping[str, str] | None = None,
) -> workflow_pb2.WorkflowSpec:
    """Reads a YAML workflow file into a ``WorkflowSpec``; ``params`` give the values of the
    parameters it declares (as :func:`loads_workflow`).

    The workflow's name defaults to the file's stem. Every exec action gets
    ``$PLAIT_WORKFLOW_DIR`` (the file's absolute directory) unless it sets it: the loader puts
    it once in the workflow's ``env`` (``WorkflowSpec.env``), not in each action.

    Raises:
        SpecError: (an ``InvalidArgumentError``) the file cannot be read or is malformed; the
            message names the file, the action and the field.
    """
    p = Path(path)
    source = os.fspath(path)
    try:
        with p.open("rb") as f:
            # Read one byte past the limit, never more: a huge file (or /dev/zero) is refused
            # without being read whole.
            data = f.read(MAX_YAML_BYTES + 1)
        if len(data) > MAX_YAML_BYTES:
            raise _too_big(source, "bytes")
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SpecError(source, [(FieldViolation("", reason), f"cannot read: {reason}")]) from None
    return loads_workflow(
        text,
        source=source,
        workflow_dir=str(p.resolve().parent),
        params=params,
        param_sources=param_sources,
    )


def load_params_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Reads a parameters file (``--input-file``): a YAML or JSON mapping of names to values,
    read by the workflow loader's bounded safe loader.

    Raises:
        SpecError: naming the file, when it cannot be read or is not such a mapping.
    """
    source = os.fspath(path)
    try:
        with Path(path).open("rb") as f:
            data = f.read(MAX_YAML_BYTES + 1)
        if len(data) > MAX_YAML_BYTES:
            raise _too_big(source, "bytes")
        doc = yaml.load(data.decode("utf-8"), Loader=_UniqueKeyLoader)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SpecError(source, [(FieldViolation("", reason), f"cannot read: {reason}")]) from None
    except yaml.YAMLError as exc:
        why = f"invalid YAML or JSON: {getattr(exc, 'problem', None) or exc}"
        raise SpecError(source, [(FieldViolation("", why), why)]) from None
    if not isinstance(doc, dict) or not all(isinstance(k, str) for k in doc):
        why = "expected a mapping of parameter names to values"
        raise SpecError(source, [(FieldViolation("", why), why)])
    return doc
