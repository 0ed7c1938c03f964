"""Per-rank worker of tests/test_qat_train.py's torchrun test: ``qat_worker.py SYNTH OUT OPTIONS_JSON``."""

import json
import os
import sys
from pathlib import Path

import torch

from fxq.data import CocoDetection, eval_transforms
from fxq.qat import QATRecipe, student_and_teacher, train_qat

if __name__ == "__main__":
    torch.set_num_threads(1)
    root, out, options = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    sets = [CocoDetection.from_folder(root, s, transforms=eval_transforms(64)) for s in ("train", "val")]
    recipe = QATRecipe("detr_tiny", policy="4-4-8", init="minmax", size=64)
    train_qat(recipe, *sets, options, out)
    if os.environ.get("RANK") == "0":
        from fxq.qat import _calib_loader

        student, _, _ = student_and_teacher(recipe, _calib_loader(sets[0], options["calib_images"]))
        torch.save(student.state_dict(), out / "initial.pt")
