"""Writes single_attention_reference.pt: what the single-attention VSAM and VGG16 of commit db686fc
(the models before attribute-group attention existed) build and output for a fixed seed, so that
tests/test_group_attention.py can show that `attention: single` is unchanged.

Run from the repository root (needs git and that commit): .venv/bin/python tests/data/make_single_attention_reference.py
"""
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

COMMIT = "db686fc"
HERE = Path(__file__).resolve().parent


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        package = Path(folder) / "reference_models"
        package.mkdir()
        for name in ("__init__.py", "heads.py", "vgg.py", "resnet.py"):
            source = subprocess.run(["git", "show", f"{COMMIT}:vsam_train/models/{name}"], check=True,
                                    capture_output=True, text=True).stdout
            (package / name).write_text(source)
        sys.path.insert(0, folder)
        from reference_models import create_model

        torch.set_num_threads(1)
        images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        reference = {"commit": COMMIT}
        for name in ("vsam", "vgg16"):
            torch.manual_seed(0)
            model = create_model(name, 5, 26, width=1 / 16, image_size=64).eval()
            with torch.no_grad():
                out = model(images)
            state = model.state_dict()
            reference[name] = {
                "names": list(state), "sums": torch.stack([v.double().sum() for v in state.values()]),
                "first": torch.stack([v.flatten()[0].double() for v in state.values()]),
                "category": out["category"], "attributes": out["attributes"],
                "attention": out["attention"] if out["attention"] is not None else torch.zeros(0)}
        torch.save(reference, HERE / "single_attention_reference.pt")


if __name__ == "__main__":
    main()
