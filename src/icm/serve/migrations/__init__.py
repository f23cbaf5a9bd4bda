"""The decision store's schema as Alembic revisions (``versions/``), run at start by
:meth:`icm.serve.store.DecisionStore.migrate` (``alembic.command.upgrade`` on the store's own
connection). A new schema change is a new revision file; never edit a released one."""
