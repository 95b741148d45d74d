"""YAML workflow files (SDK layer: plait.spec).

:func:`load_workflow` reads a file and :func:`loads_workflow` parses text; both go through the
converter of :mod:`plait.spec.convert`, so errors name the file, the action and the field. YAML
is read with a safe loader that also refuses a key repeated in one mapping.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from plait.errors import FieldViolation
from plait.spec.convert import SpecError, build_spec
from plait.v1 import workflow_pb2

__all__ = ["WORKFLOW_DIR_ENV", "load_workflow", "loads_workflow"]

# Set on every exec action of a file loaded by load_workflow (unless the file sets it), so a flow
# can run scripts kept beside it when its workers share the filesystem (as `plait run`'s do).
WORKFLOW_DIR_ENV = "PLAIT_WORKFLOW_DIR"


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a key repeated in one mapping instead of keeping the last."""


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


def loads_workflow(
    text: str, *, source: str = "<string>", workflow_dir: str | None = None
) -> workflow_pb2.WorkflowSpec:
    """Parses YAML text as a workflow; ``source`` names it in errors.

    When ``workflow_dir`` is given it becomes ``$PLAIT_WORKFLOW_DIR`` of every exec action that
    does not set that variable itself.
    """
    try:
        doc = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(
            source, [(FieldViolation("", f"{at}{problem}"), f"invalid YAML: {at}{problem}")]
        ) from None
    default_name = Path(source).stem or "workflow"
    spec = build_spec(doc, source, default_name)
    if workflow_dir is not None:
        for action in spec.actions:
            for runs in (action, *action.pipeline.stages):
                if runs.WhichOneof("kind") == "exec" and WORKFLOW_DIR_ENV not in runs.env:
                    runs.env[WORKFLOW_DIR_ENV] = workflow_dir
    return spec


def load_workflow(path: str | os.PathLike[str]) -> workflow_pb2.WorkflowSpec:
    """Reads a YAML workflow file into a ``WorkflowSpec``.

    The workflow's name defaults to the file's stem. Every exec action gets
    ``$PLAIT_WORKFLOW_DIR`` (the file's absolute directory) unless it sets it.

    Raises:
        SpecError: (an ``InvalidArgumentError``) the file cannot be read or is malformed; the
            message names the file, the action and the field.
    """
    p = Path(path)
    source = os.fspath(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SpecError(source, [(FieldViolation("", reason), f"cannot read: {reason}")]) from None
    return loads_workflow(text, source=source, workflow_dir=str(p.resolve().parent))
