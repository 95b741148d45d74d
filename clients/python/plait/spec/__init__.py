"""Workflow files and the workflow builder (SDK layer, on top of the protocol).

A YAML workflow file maps 1:1 onto ``plait.v1.WorkflowSpec``; :func:`load_workflow` reads one and
:class:`Workflow` builds the same spec from Python. Both go through one converter, so a key means
the same thing in either place and every mistake is reported the same way: naming the file (or
the builder), the action (index and id) and the field, for example::

    flow.yaml: actions[2] (id 'resize'): timeout: expected a duration such as 250ms, 2s or 5m,
    got 'soon'

The package is split by what each part handles:

* :mod:`plait.spec.convert` — a parsed document to a ``WorkflowSpec``, with field-path errors
  (:class:`SpecError`, :class:`ActionRef`, :func:`spec_from_dict`);
* :mod:`plait.spec.patterns` — the keys that say how actions run together: ``join``, ``map``,
  ``resources``, ``concurrency_key``, ``lock``, ``semaphores``;
* :mod:`plait.spec.fields` — the field checks and error collection the converters share;
* :mod:`plait.spec.files` — YAML files and text (:func:`load_workflow`, :func:`loads_workflow`),
  read through :mod:`plait.spec.fastyaml` (libyaml, or the JSON parser for JSON);
* :mod:`plait.spec.plain` and :mod:`plait.spec.validate_plain` — fast paths of the converter
  and of submit validation for plain actions (large generated workflows);
* :mod:`plait.spec.builder` — the Python builder (:class:`Workflow`, :class:`Join`).

Everything public is re-exported here, so ``from plait.spec import ...`` is the import to use.
"""

from __future__ import annotations

from plait.spec.builder import ActionOptions, Join, Workflow
from plait.spec.builder import Needs as Needs
from plait.spec.convert import (
    ACTION_KEYS,
    DEFAULTS_KEYS,
    RETRY_KEYS,
    TOP_LEVEL_KEYS,
    ActionRef,
    SpecError,
    spec_from_dict,
)
from plait.spec.convert import LATER_KEYS as LATER_KEYS
from plait.spec.files import WORKFLOW_DIR_ENV, load_workflow, loads_workflow
from plait.spec.patterns import JOIN_KEYS, MAP_KEYS, SEMAPHORE_KEYS

# `Needs` and `LATER_KEYS` stay importable from here, as before, but out of `import *`.
__all__ = [
    "ACTION_KEYS",
    "DEFAULTS_KEYS",
    "JOIN_KEYS",
    "MAP_KEYS",
    "RETRY_KEYS",
    "SEMAPHORE_KEYS",
    "TOP_LEVEL_KEYS",
    "WORKFLOW_DIR_ENV",
    "ActionOptions",
    "ActionRef",
    "Join",
    "SpecError",
    "Workflow",
    "load_workflow",
    "loads_workflow",
    "spec_from_dict",
]
