"""examples/train.py end to end on CPU, in subprocesses, tiny models and two steps: a single-process run
that saves, then resumes; a 2-process torchrun (DDP on gloo); a patched timm model on an ImageFolder."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TRAIN = Path(__file__).resolve().parents[2] / "examples" / "train.py"
TINY_VIT = [
    "--model",
    "vit_tiny_patch16_224",
    "--model-kwargs",
    "depth=2",
    "embed_dim=32",
    "num_heads=2",
    "--img-size",
    "32",
    "--num-classes",
    "5",
    "--batch-size",
    "2",
    "--steps-per-epoch",
    "2",
]


def run(cmd, cwd, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout + proc.stderr


def test_single_process_save_and_resume(tmp_path):
    out = tmp_path / "ckpt"
    common = [*TINY_VIT, "--output", str(out), "--drop-path-rate", "0.1", "--grad-checkpointing"]
    log = run([sys.executable, str(TRAIN), *common, "--epochs", "1"], tmp_path)  # AMP bf16 by default
    assert "1 process(es) on cpu, amp bf16, grad checkpointing on" in log
    first = torch.load(out / "checkpoint-1.pt", weights_only=True)
    assert first["epoch"] == 1 and first["step"] == 2 and (out / "last.pt").exists()

    # resume for a second epoch, with tqdm hidden: the plain one-line progress is used instead
    script = (
        "import runpy, sys; sys.modules['tqdm'] = None; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    log = run(
        [sys.executable, "-c", script, str(TRAIN), *common, "--epochs", "2", "--resume", str(out / "last.pt")], tmp_path
    )
    assert "resumed from" in log and "epoch 2/2 2/2" in log and "epoch 1/2" not in log
    second = torch.load(out / "checkpoint-2.pt", weights_only=True)
    assert second["epoch"] == 2 and second["step"] == 4
    # the optimizer went on from the saved state (AdamW counts 4 steps, not 2) and the weights moved on
    assert all(float(s["step"]) == 4 for s in second["optimizer"]["state"].values())
    assert any(not torch.equal(second["model"][k], first["model"][k]) for k in first["model"])

    from vitkernels.models import create_model

    model = create_model("vit_tiny_patch16_224", depth=2, embed_dim=32, num_heads=2, img_size=32, num_classes=5)
    model.load_state_dict(second["model"], strict=True)


def test_torchrun_two_processes(tmp_path):
    import torch.distributed as dist

    if importlib.util.find_spec("torch.distributed.run") is None:
        pytest.skip("torchrun (torch.distributed.run) is unavailable")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is unavailable")
    out = tmp_path / "ckpt"
    log = run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(TRAIN),
            *TINY_VIT,
            "--epochs",
            "1",
            "--output",
            str(out),
            "--amp",
            "fp16",
            "--no-progress",
        ],
        tmp_path,
    )
    assert "2 process(es) on cpu, amp fp16" in log and log.count("epoch 1: mean loss") == 1  # rank 0 reports
    ckpt = torch.load(out / "checkpoint-1.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["scaler"] is not None
    assert not any(k.startswith("module.") for k in ckpt["model"])  # saved unwrapped from DDP


def test_patched_timm_model_on_an_image_folder(tmp_path):
    pytest.importorskip("timm")
    pytest.importorskip("torchvision")
    image = pytest.importorskip("PIL.Image")
    for c in range(2):
        (tmp_path / "data" / f"class{c}").mkdir(parents=True)
        for i in range(2):
            pixels = torch.randint(0, 256, (40, 40, 3), dtype=torch.uint8).numpy()
            image.fromarray(pixels).save(tmp_path / "data" / f"class{c}" / f"{i}.png")
    log = run(
        [
            sys.executable,
            str(TRAIN),
            "--timm",
            "--model",
            "vit_tiny_patch16_224",
            "--model-kwargs",
            "depth=1",
            "--img-size",
            "32",
            "--num-classes",
            "2",
            "--batch-size",
            "2",
            "--epochs",
            "1",
            "--data",
            str(tmp_path / "data"),
            "--output",
            str(tmp_path / "ckpt"),
            "--no-progress",
        ],
        tmp_path,
    )
    assert "(timm, patched)" in log and "2 steps/epoch" in log
    assert (tmp_path / "ckpt" / "checkpoint-1.pt").exists()
