"""Train a DDPM (Algorithm 1, L_simple) on sklearn's digits or a folder of PNGs; resumable."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from fastdiff.commands import (
    UsageError,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    resolve_device,
    seed_int,
    unit_interval_float,
)

#: The shipped digits model: ~1.1M parameters, 16x16 grayscale.
DIGITS_MODEL = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), num_groups=8, dropout=0.0)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="digits",
                        help="'digits' (sklearn's bundled digits, 16x16) or a folder of PNG images (default: %(default)s)")
    parser.add_argument("--steps", type=positive_int, default=3000, help="total optimisation steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="default: %(default)s")
    parser.add_argument("--lr", type=positive_float, default=5e-4, help="AdamW learning rate (default: %(default)s)")
    parser.add_argument("--lr-warmup", type=non_negative_int, default=200, help="linear warm-up steps (default: %(default)s)")
    parser.add_argument("--weight-decay", type=non_negative_float, default=0.0, help="default: %(default)s")
    parser.add_argument("--grad-clip", type=positive_float, default=1.0, help="max gradient norm (default: %(default)s)")
    parser.add_argument("--ema-decay", type=unit_interval_float, default=0.999, help="default: %(default)s")
    parser.add_argument("--seed", type=seed_int, default=0, help="init, batch, timestep and noise seed (default: %(default)s)")
    model = parser.add_argument_group("model (default: the shipped digits model)")
    model.add_argument("--ch", type=positive_int, default=DIGITS_MODEL["ch"])
    model.add_argument("--ch-mult", type=_int_list, default=DIGITS_MODEL["ch_mult"], help="e.g. 1,2,2")
    model.add_argument("--num-res-blocks", type=positive_int, default=DIGITS_MODEL["num_res_blocks"])
    model.add_argument("--attn-resolutions", type=_int_list, default=DIGITS_MODEL["attn_resolutions"],
                       help="feature-map sizes with self-attention, e.g. 8 (empty string: none)")
    model.add_argument("--num-groups", type=positive_int, default=DIGITS_MODEL["num_groups"])
    model.add_argument("--dropout", type=unit_interval_float, default=DIGITS_MODEL["dropout"])
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("out/train"),
                        help="where checkpoint.safetensors is written (default: %(default)s)")
    parser.add_argument("--checkpoint-every", type=non_negative_int, default=250, help="steps between checkpoints (default: %(default)s)")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir's checkpoint")
    parser.add_argument("--export", type=Path, metavar="FOLDER",
                        help="at the end, save the EMA weights as a model folder (config.json + model.safetensors)")
    parser.add_argument("--compile", action="store_true", help="run the model through torch.compile")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available, else cpu)")
    parser.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--log-file", type=Path, help="append one line per log window to this file")
    parser.add_argument("--log-every", type=positive_int, default=50, help="steps per log line (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    """Under torchrun every process trains (DistributedDataParallel); rank 0 alone prints, logs,
    checkpoints and exports."""
    from fastdiff.scale.distributed import process_group

    with process_group(resolve_device(args.device)) as (device, world):
        return _train(args, device, world)


def _train(args: argparse.Namespace, device: str, world) -> int:
    import torch

    from fastdiff.models.unet import UNetConfig
    from fastdiff.training.data import load_training_images
    from fastdiff.training.trainer import CHECKPOINT_FILE, TrainConfig, Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        data = load_training_images(args.data)
        model_config = UNetConfig(
            image_size=data.shape[-1], in_channels=data.shape[1], out_channels=data.shape[1], ch=args.ch,
            ch_mult=args.ch_mult, num_res_blocks=args.num_res_blocks, attn_resolutions=args.attn_resolutions,
            num_groups=args.num_groups, dropout=args.dropout,
        )
        train_config = TrainConfig(
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, lr_warmup_steps=args.lr_warmup,
            weight_decay=args.weight_decay, grad_clip=args.grad_clip, ema_decay=args.ema_decay, seed=args.seed,
        )
        if data.shape[-1] != data.shape[-2]:
            raise ValueError(f"images must be square, got {data.shape[-2]}x{data.shape[-1]} (height x width)")
    except ValueError as e:
        raise UsageError(str(e)) from None

    try:
        trainer = Trainer(model_config, train_config, data, device=device, compile=args.compile, world=world)
    except ValueError as e:
        raise UsageError(str(e)) from None
    say = print if world.is_main else (lambda *a, **k: None)
    checkpoint = args.checkpoint_dir / CHECKPOINT_FILE
    if args.resume:
        if not checkpoint.is_file():
            raise UsageError(f"--resume: no checkpoint at {checkpoint}")
        try:
            trainer.load_checkpoint(checkpoint)
        except ValueError as e:
            raise UsageError(str(e)) from None
    elif checkpoint.exists():
        raise UsageError(f"{checkpoint} exists: pass --resume to continue it, or another --checkpoint-dir")

    params = sum(p.numel() for p in trainer.model.parameters())
    say(f"data:  {args.data}: {data.shape[0]} images of {tuple(data.shape[1:])}")
    say(f"model: {params:,} parameters; training steps {trainer.step} -> {train_config.steps}, "
        f"batch {train_config.batch_size}" + (f" ({world.size} processes x {train_config.batch_size // world.size})"
                                              if world.distributed else "")
        + f", on {device}" + (" (compiled)" if args.compile else ""))

    from tqdm.auto import tqdm

    bar = tqdm(total=train_config.steps, initial=trainer.step, disable=args.no_progress or not world.is_main, unit="step")
    start = time.perf_counter()

    def on_log(step: int, loss: float, images_per_s: float) -> None:
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.0f}")
        if args.log_file is not None and world.is_main:
            with open(args.log_file, "a") as f:
                f.write(f"step {step} loss {loss:.5f} images/s {images_per_s:.1f} "
                        f"elapsed_s {time.perf_counter() - start:.0f}\n")

    loss = trainer.train(checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                         on_log=on_log, log_every=args.log_every)
    bar.close()
    seconds = time.perf_counter() - start
    summary = "no steps left to run" if loss is None else f"last loss {loss:.4f}, {seconds:.0f} s this run"
    say(f"done:  step {trainer.step}, {summary}; checkpoint {checkpoint}")
    if args.export is not None and world.is_main:
        folder = trainer.export(args.export, extra={"data": str(args.data)})
        print(f"wrote: EMA model to {folder}")
    return 0


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
