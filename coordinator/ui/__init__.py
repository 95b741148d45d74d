"""The coordinator's web UI (edge layer): ``--ui-listen``, see docs/ui.md.

:mod:`.server` serves the committed static pages (``static/``) and the endpoints of
:mod:`.api` (JSON) and :mod:`.streams` (server-sent events), which call the API's own
servicers after authorizing each request as the RPC it serves (:mod:`.access`).
"""
