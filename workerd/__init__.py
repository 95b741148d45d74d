"""The Plait worker daemon, ``plait-workerd`` (workerd layer).

It imports ``plait`` (and ``plait.worker``), never ``plait.coordinator``.

It serves exec actions (:mod:`plait.workerd.exec_executor`, sandboxed by
:mod:`plait.workerd.sandbox` and :mod:`plait.workerd.confinement` — run-as users
(:mod:`~plait.workerd.runas`), rlimits (:mod:`~plait.workerd.rlimits`), cgroups and uid sweeps
(:mod:`~plait.workerd.containment`), a private tmp root (:mod:`~plait.workerd.tmproot`), all
set up by :mod:`~plait.workerd.startup`; each attempt forked and exec'd by the spawner,
:mod:`plait.workerd.spawner` — with no zombies thanks to :mod:`plait.workerd.keeper`) and,
optionally, Python handlers, over one
:class:`plait.worker.session.WorkerSession`.

Kept import-free so that ``python -m plait.workerd.keeper`` starts fast.
"""
