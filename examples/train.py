"""Train a vitkernels model (or a timm model patched by vitkernels) with AMP, optionally distributed.

Single process:
    python examples/train.py --model vit_small_patch16_224 --epochs 1 --steps-per-epoch 20
Several processes (DistributedDataParallel; nccl on CUDA, gloo on CPU):
    torchrun --nproc_per_node=8 examples/train.py --model swin_tiny_patch4_window7_224 --data /imagenet/train

Model:   `--model NAME` from `vitkernels.models.list_models()` (built with num_classes and drop_path_rate),
         or with `--timm` any timm model, patched in place by `vitkernels.patch_timm`. `--model-kwargs k=v ...`
         passes more constructor arguments (Python literals: depth=2 depths=(2,2)).
Data:    synthetic by default (seeded random images or clips and labels; segmentation masks for SegFormer),
         or `--data DIR`, an ImageFolder tree (torchvision, imported only then).
AMP:     `--amp bf16` (default) runs the forward under torch.autocast in bfloat16; `--amp fp16` uses float16
         with a torch.amp.GradScaler; `--amp none` trains in float32.
Saving:  a checkpoint (model, optimizer, LR schedule, grad scaler, epoch) after every epoch in `--output`
         (checkpoint-<epoch>.pt and last.pt); `--resume PATH` continues from one.
Also:    `--grad-checkpointing`, AdamW with warmup + cosine decay, label smoothing, gradient clipping; a
         progress bar (tqdm when installed, else one updating line) on rank 0.
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

import vitkernels
from vitkernels.models import create_model, list_models


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--timm", action="store_true", help="build the model with timm and vitkernels.patch_timm it")
    p.add_argument(
        "--model-kwargs",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="extra constructor arguments, values as Python literals",
    )
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--drop-path-rate", type=float, default=0.1)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--data", default=None, help="ImageFolder directory (default: synthetic data)")
    p.add_argument(
        "--synthetic-size",
        type=int,
        default=None,
        help="samples in the synthetic set (default: batch size x world size x steps per epoch)",
    )
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--steps-per-epoch", type=int, default=None, help="stop each epoch after this many steps")
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--clip-grad", type=float, default=None)
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default="bf16")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--output", default="checkpoints")
    p.add_argument("--resume", default=None, help="checkpoint to continue from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda:<local rank> when CUDA is available, else cpu")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    kwargs = {}
    for item in args.model_kwargs:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--model-kwargs: expected KEY=VALUE, got {item!r}")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value  # a plain string
    args.model_kwargs = kwargs
    return args


# ----------------------------------------------------------------------------- distributed set-up


def setup_distributed(args):
    """(rank, world_size, device). Initialises the default process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device is not None:
        device = torch.device(args.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


# ----------------------------------------------------------------------------- data


class SyntheticDataset(Dataset):
    """Seeded random samples: sample i is the same in every process and every run."""

    def __init__(self, size: int, shape, num_classes: int, seed: int, mask_shape=None):
        self.size, self.shape, self.num_classes = size, tuple(shape), num_classes
        self.seed, self.mask_shape = seed, mask_shape

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        x = torch.randn(self.shape, generator=g)
        if self.mask_shape is not None:  # segmentation: a per-pixel label map
            return x, torch.randint(0, self.num_classes, self.mask_shape, generator=g)
        return x, int(torch.randint(0, self.num_classes, (), generator=g))


def build_dataset(args, model, world: int):
    frames = getattr(model, "num_frames", None)
    segmentation = is_segmentation(model)
    if args.data is not None:
        if frames or segmentation:
            raise SystemExit(
                "--data (ImageFolder) holds classification images; video and segmentation models "
                "train on synthetic data here"
            )
        from torchvision import datasets, transforms  # only needed for real data

        tf = transforms.Compose(
            [
                transforms.RandomResizedCrop(args.img_size),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            ]
        )
        return datasets.ImageFolder(args.data, transform=tf)
    shape = (3, frames, args.img_size, args.img_size) if frames else (3, args.img_size, args.img_size)
    size = args.synthetic_size or args.batch_size * world * (args.steps_per_epoch or 10)
    mask = (args.img_size, args.img_size) if segmentation else None
    return SyntheticDataset(size, shape, args.num_classes, args.seed, mask)


def is_segmentation(model) -> bool:
    from vitkernels.models.segformer import SegFormer

    return isinstance(model, SegFormer)


# ----------------------------------------------------------------------------- model


def _create(factory, name, img_size, kwargs):
    """factory(name, img_size=..., **kwargs); models without an img_size argument (PVTv2, SegFormer: any
    input size) are built without it."""
    if "img_size" in kwargs:
        return factory(name, **kwargs)
    try:
        return factory(name, img_size=img_size, **kwargs)
    except TypeError as e:
        if "img_size" not in str(e):
            raise
        return factory(name, **kwargs)


def build_model(args):
    kwargs = dict(num_classes=args.num_classes, drop_path_rate=args.drop_path_rate, **args.model_kwargs)
    if args.timm:
        import timm

        model = _create(lambda n, **kw: timm.create_model(n, pretrained=False, **kw), args.model, args.img_size, kwargs)
        vitkernels.patch_timm(model)
    else:
        if args.model not in list_models():
            raise SystemExit(f"unknown vitkernels model {args.model!r}; choose from {list_models()} or pass --timm")
        model = _create(create_model, args.model, args.img_size, kwargs)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def loss_fn(logits, target, label_smoothing: float):
    logits = logits.float()
    if logits.dim() == 4:  # segmentation logits at 1/4 resolution: upsample to the label map
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing)


def lr_at(step: int, total: int, args) -> float:
    """Linear warmup, then cosine decay to 0 (a multiplier of --lr)."""
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, total - args.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


# ----------------------------------------------------------------------------- progress


class Progress:
    """tqdm when it is installed, else a single line rewritten in place."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.enabled, self.n = total, desc, enabled, 0
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True, file=sys.stdout)
            except ImportError:
                self.bar = None
        self.start = time.time()

    def update(self, **metrics):
        self.n += 1
        if not self.enabled:
            return
        metrics = {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}  # syncs: rank 0 only
        text = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        else:
            rate = self.n / max(time.time() - self.start, 1e-9)
            end = "\n" if self.n == self.total else ""
            print(f"\r{self.desc} {self.n}/{self.total} [{rate:.2f} it/s] {text}", end=end, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path, model, optimizer, scaler, epoch: int, step: int, args):
    state = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "step": step,
        "args": {k: v for k, v in vars(args).items() if k != "resume"},
    }
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # never a half-written checkpoint


def unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


# ----------------------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed(args)
    main_process = rank == 0
    torch.manual_seed(args.seed)  # the same initial weights in every process (DDP also broadcasts them)

    model = build_model(args).to(device)
    dataset = build_dataset(args, model, world)
    sampler = (
        DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
        if world > 1
        else None
    )
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=args.workers,
        drop_last=True,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(args.seed),
    )
    steps_per_epoch = min(len(loader), args.steps_per_epoch or len(loader))
    if steps_per_epoch == 0:
        raise SystemExit("no full batch per process: lower --batch-size or add data")
    total_steps = steps_per_epoch * args.epochs

    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and p.requires_grad]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 and p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr
    )
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[args.amp]
    scaler = torch.amp.GradScaler(device.type) if amp_dtype is torch.float16 else None

    start_epoch, step = 0, 0
    if args.resume:
        ckpt = torch.load(args.resume, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"], strict=True)
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler") is not None:
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step = ckpt["epoch"], ckpt["step"]
        if main_process:
            print(f"resumed from {args.resume}: epoch {start_epoch} done, step {step}", flush=True)

    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if main_process:
        os.makedirs(args.output, exist_ok=True)
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"model {args.model}{' (timm, patched)' if args.timm else ''}: {n_params / 1e6:.2f}M parameters, "
            f"{world} process(es) on {device}, amp {args.amp}, grad checkpointing "
            f"{'on' if args.grad_checkpointing else 'off'}, {steps_per_epoch} steps/epoch",
            flush=True,
        )

    for epoch in range(start_epoch, args.epochs):
        model.train()
        if sampler is not None:
            sampler.set_epoch(epoch)
        progress = Progress(steps_per_epoch, f"epoch {epoch + 1}/{args.epochs}", main_process and not args.no_progress)
        running, seen = torch.zeros((), device=device), 0
        for i, (x, target) in enumerate(loader):
            if i == steps_per_epoch:
                break
            x, target = x.to(device, non_blocking=True), target.to(device, non_blocking=True)
            for group in optimizer.param_groups:
                group["lr"] = args.lr * lr_at(step, total_steps, args)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = loss_fn(model(x), target, args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if args.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            step += 1
            running += loss.detach()
            seen += 1
            progress.update(loss=loss.detach(), lr=optimizer.param_groups[0]["lr"])
        progress.close()
        if world > 1:
            dist.all_reduce(running)
            running /= world
        mean_loss = float(running) / max(seen, 1)
        if not math.isfinite(mean_loss):
            raise SystemExit(f"epoch {epoch + 1}: the loss is not finite ({mean_loss})")
        if main_process:
            path = os.path.join(args.output, f"checkpoint-{epoch + 1}.pt")
            save_checkpoint(path, model, optimizer, scaler, epoch + 1, step, args)
            save_checkpoint(os.path.join(args.output, "last.pt"), model, optimizer, scaler, epoch + 1, step, args)
            print(f"epoch {epoch + 1}: mean loss {mean_loss:.4f}, saved {path}", flush=True)
        if world > 1:
            dist.barrier()  # every process sees the checkpoint before going on

    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
