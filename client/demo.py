"""``python -m client.demo``: generate a small demo dataset and log two versions of it.

Used by ``make run`` so a fresh machine shows the whole path: SDK log -> store -> listing
(and the mount, once ``make run`` mounts it).  Idempotent: re-running logs nothing new, because
an unchanged directory has the same digest as ``latest`` (the W&B no-op rule).
"""

from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path


def make_tree(root: Path, seed: int = 0, files: int = 20) -> Path:
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels.csv").write_text("".join(f"img_{i:03d}.bin,{rng.randint(0, 9)}\n" for i in range(files)))
    for i in range(files):
        (root / "images" / f"img_{i:03d}.bin").write_bytes(rng.randbytes(4096 + 37 * i))
    (root / "README.txt").write_text("artifactfs demo dataset: random 'images' and a labels file\n")
    return root


def main() -> int:
    import client

    if client.Api(overrides={"project": "demo"}).artifact_exists("mnist-mini:demo"):
        print("demo artifact already logged (mnist-mini:demo); nothing to do")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        tree = make_tree(Path(tmp) / "demo")
        with client.init(project="demo", job_type="make-demo") as run:
            art = client.Artifact("mnist-mini", type="dataset", description="demo dataset made by `make run`",
                                  metadata={"files": 21, "source": "client.demo"})
            art.add_dir(str(tree))
            run.log_artifact(art, aliases=["demo"])
            art.wait()
            print(f"logged {art.qualified_name} ({art.file_count} files, {art.size} bytes, digest {art.digest})")
            # a second, incremental version: one file changed, one added
            draft = art.new_draft()
            with draft.new_file("images/img_000.bin", mode="wb") as f:
                f.write(b"changed in v1")
            with draft.new_file("extra/notes.txt", mode="w") as f:
                f.write("added in v1\n")
            run.log_artifact(draft)
            draft.wait()
            print(f"logged {draft.qualified_name} (incremental: {draft.file_count} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
