"""Writable drafts, by layer (top to bottom):

* :mod:`.fs` — the FUSE side: inodes keyed by (draft, node), one method per write operation,
  the sentinel (``.commit``) and status (``.commit.status``) files and xattrs;
* :mod:`.manager` — the drafts of one store: where they are staged, listing, creation, the
  commit trigger, rebase onto a moved ``latest``, recovery after a crash;
* :mod:`.commit` — one commit: plan the new manifest from the draft's changes against its base,
  upload what changed, register the version (check-and-set on ``latest``);
* :mod:`.plan` — what a commit (and a draft's creation) writes into the tree besides the POSIX
  operations: the base rows, the rebase, a merged version's entries;
* :mod:`.tree` — the staging tree's names (``DraftTree``: lookup, directories, links, renames,
  attributes), over :mod:`.files` — its open files (handles, reads, writes, copy-up, the
  sentinel's commit requests) — over :mod:`.data` (the ``data/<node id>`` files) and
  :mod:`.rows` (the SQLite database: schema, statements, rows as named types), all under
  ``<cache>/drafts/store-<id>/`` and tested without a mount.

Errors are the classes of :mod:`mountfs.errors`; ``errno_for`` there maps them for the kernel.
"""
