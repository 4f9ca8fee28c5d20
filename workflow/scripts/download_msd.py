"""Fetch a Medical Segmentation Decathlon task with MONAI's DecathlonDataset (rule `download_<dataset>`).

Runs only for a dataset entry with `download: true` whose root is absent; it needs a network, so it
is a local rule (cluster compute nodes often have none) and never runs in the tests. The archive is
downloaded and checked (MD5) into a staging folder beside the root, and the extracted task folder is
renamed into place in one step, so an interrupted download never leaves a half-written root.
"""
import os
import shutil
import sys
from pathlib import Path


def download(root: Path) -> None:
    """Download and extract the Decathlon task named by `root`'s folder name into `root`."""
    from monai.apps import DecathlonDataset

    task = root.name
    if task not in DecathlonDataset.resource:
        raise SystemExit(f"{root}: {task!r} is not a Decathlon task; known: {sorted(DecathlonDataset.resource)}")
    staging = root.parent / f".download-{task}"
    staging.mkdir(parents=True, exist_ok=True)
    # cache_rate=0: download, verify and extract only; no image is loaded here.
    DecathlonDataset(root_dir=staging, task=task, section="training", download=True,
                     cache_rate=0.0, cache_num=0, progress=True)
    if not (staging / task / "dataset.json").is_file():
        raise SystemExit(f"{staging / task}: the extracted archive has no dataset.json")
    os.replace(staging / task, root)
    shutil.rmtree(staging, ignore_errors=True)
    print(f"downloaded {task} into {root}")


if "snakemake" in globals():  # run by the rule's `script:` directive
    with open(snakemake.log[0], "w") as log:  # noqa: F821 (provided by Snakemake)
        sys.stdout = sys.stderr = log
        download(Path(snakemake.params.root))  # noqa: F821
elif __name__ == "__main__":  # by hand: python workflow/scripts/download_msd.py DIR/Task04_Hippocampus
    download(Path(sys.argv[1]))
