"""Writable drafts, by layer (top to bottom):

* :mod:`.fs` — the FUSE side: inodes keyed by (draft, node), one method per write operation,
  the sentinel (``.commit``) and status (``.commit.status``) files and xattrs;
* :mod:`.manager` — the drafts of one store: where they are staged, listing, creation, the
  commit trigger, rebase onto a moved ``latest``, recovery after a crash;
* :mod:`.commit` — one commit: plan the new manifest from the draft's changes against its base,
  upload what changed, register the version (check-and-set on ``latest``);
* :mod:`.tree` — the staging tree itself: SQLite rows plus data files under
  ``<cache>/drafts/store-<id>/``, tested without a mount.
"""
