"""`nanoswarm shard` and `nanoswarm train`: model directories and the models in them."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from .params import LEARNING_RATE, NEW_FILE, THREADS

_T = TypeVar("_T")


@click.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--layers-per-shard", type=click.IntRange(min=1), default=1, show_default=True,
              help="Blocks in each weight file (a node loads the files of the blocks it serves).")
@click.option("--head-groups", type=int, default=None,
              help="Also write head-sliced files for G near-equal groups of heads (head shards load only theirs).")
@click.option("--heads", "heads_spec", default=None,
              help="Also write head-sliced files for these head ranges, half-open, covering every head once: "
                   "0:6,6:12.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True, help="Storage dtype of the shard files.")
@click.option("--overwrite", is_flag=True,
              help="Write into OUT_DIR although it is not empty (an earlier model's shard files there are removed).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def shard(source: Path, out_dir: Path, layers_per_shard: int, head_groups: int | None,
          heads_spec: str | None, dtype: str, overwrite: bool, as_json: bool) -> None:
    """Cut a checkpoint (nanoGPT ckpt.pt or Hugging Face GPT-2 dir) into a model directory.

    OUT_DIR is made if needed; one that is not empty is refused without --overwrite."""
    import torch

    from nanoswarm.shards.cut import check_storable, write_model_dir
    from nanoswarm.shards.loaders import check_tokenizer_vocab, load_checkpoint
    from nanoswarm.shards.manifest import head_split_pairs, parse_head_splits
    from nanoswarm.shards.model import ModelConfig

    if heads_spec is not None and not heads_spec.strip():  # (an empty --heads was taken as none given)
        raise click.BadParameter("names no head range; give ranges such as 0:6,6:12", param_hint="'--heads'")
    _head_option_errors(head_split_pairs, heads_spec, head_groups)  # before a checkpoint is read
    _check_out_dir(out_dir, overwrite)
    shards_log = logging.getLogger("nanoswarm.shards")  # its progress lines, -v or not
    shards_log.setLevel(min(shards_log.getEffectiveLevel(), logging.INFO))

    def check(config: ModelConfig) -> None:  # before the weights are read: a large model takes minutes
        check_tokenizer_vocab(config, str(source))
        _head_option_errors(parse_head_splits, heads_spec, head_groups, config.n_head)

    config, state = load_checkpoint(source, check=check)
    splits = parse_head_splits(heads_spec, head_groups, config.n_head)  # (checked above)
    try:  # (write_model_dir checks too; here the line names the checkpoint the weight came from)
        check_storable(state, getattr(torch, dtype))
    except ValueError as e:
        raise click.ClickException(f"{source}: {e}") from None
    manifest = write_model_dir(config, state, out_dir, layers_per_shard, splits, getattr(torch, dtype))
    if as_json:
        click.echo(json.dumps({"model_id": manifest.model_id, **json.loads(manifest.to_json())}))
    else:
        click.echo(f"{out_dir}: model {manifest.model_id[:16]}, {len(manifest.files)} weight files")


def _head_option_errors(check: Callable[..., _T], spec: str | None, groups: int | None, *more: Any) -> _T:
    """`check(spec, groups, ...)`, its refusals worded as option errors (exit 2, like click's)."""
    try:
        return check(spec, groups, *more)
    except ValueError as e:
        if spec and groups is not None:
            raise click.UsageError(str(e)) from None
        raise click.BadParameter(str(e), param_hint="'--heads'" if spec else "'--head-groups'") from None


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """OUT_DIR can take the model, found before a checkpoint is read (a large one takes minutes):
    a directory (or none yet, under one that can be written), and an empty one unless
    --overwrite. Writing into a full directory unasked removed an earlier model's files or put
    shards beside the checkpoint they were cut from (a review)."""
    from nanoswarm.shards.cut import is_leftover

    try:
        if out_dir.is_symlink() and not out_dir.exists():
            raise click.ClickException(f"{out_dir} is a symbolic link to nothing: give a new or empty directory")
        if out_dir.exists() and not out_dir.is_dir():
            raise click.ClickException(f"{out_dir} is not a directory: give a new or empty directory as OUT_DIR")
        if out_dir.is_dir():
            # (what a shard run killed midway left is no model: the write removes it)
            if any(not is_leftover(p.name) for p in out_dir.iterdir()) and not overwrite:
                raise click.ClickException(f"{out_dir} is not empty: pass --overwrite to write the model there "
                                           "(an earlier model's shard files in it are removed)")
            _probe(out_dir, f"{out_dir}:")
        else:
            _probe_nearest(out_dir, f"{out_dir}:")
    except OSError as e:  # a directory on the way that cannot be read or searched
        raise click.ClickException(f"{out_dir}: {e.strerror or e}") from None


def _probe_nearest(path: Path, what: str) -> None:
    """`_probe` of the nearest existing directory above `path` (the rest is made when written)."""
    existing = path.absolute().parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise click.ClickException(f"{what} {existing} is not a directory")
    _probe(existing, what)


def _probe(directory: Path, what: str) -> None:
    """A ClickException unless a file can be made in `directory` (removed at once)."""
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".nanoswarm.", suffix=".probe"):
            pass
    except OSError as e:
        raise click.ClickException(f"{what} cannot write in {directory}: {e.strerror or e}") from None


def _check_writable(out_path: Path) -> None:
    """--out can be written: its nearest existing directory takes a file (the rest is made at the
    first save). Found at once, not at the first eval point, after the text was read and the
    model built (in torch's words there); nothing is left behind."""
    _probe_nearest(out_path, f"--out {out_path}:")


@click.command()
@click.option("--out", "out_path", type=NEW_FILE, default=Path("out/ckpt.pt"), show_default=True,
              help="Where to write the nanoGPT-style checkpoint (the best by validation loss).")
@click.option("--text", "text_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Training text, UTF-8 (default: tiny Shakespeare shipped with nanoswarm).")
@click.option("--n-layer", type=click.IntRange(min=1), default=4, show_default=True, help="Transformer blocks.")
@click.option("--n-head", type=click.IntRange(min=1), default=4, show_default=True, help="Attention heads a block.")
@click.option("--n-embd", type=click.IntRange(min=1), default=192, show_default=True,
              help="Width (a multiple of --n-head).")
@click.option("--block-size", type=click.IntRange(min=1), default=128, show_default=True,
              help="Context length in tokens.")
@click.option("--max-iters", type=click.IntRange(min=0), default=700, show_default=True,
              help="Training steps (the defaults take ~30 min on one core).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Sequences a step.")
@click.option("--lr", type=LEARNING_RATE, default=2e-3, show_default=True,
              help="Peak learning rate, after --warmup steps; cosine decay to a tenth of it at --max-iters.")
@click.option("--warmup", type=click.IntRange(min=0), default=50, show_default=True,
              help="Steps of linear warmup (lower it for short runs).")
@click.option("--eval-interval", type=click.IntRange(min=1), default=100, show_default=True,
              help="Steps between validation evals; each writes --out if its loss is the best so far, "
                   "which is where --resume continues from.")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=1337, show_default=True,
              help="Seed of the weights and batches: the same settings give the same model.")
@click.option("--threads", type=THREADS, default=1, show_default=True,
              help="torch threads (speed; other counts may change the last bits of the results).")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing --out (the run writes its first checkpoint at its first eval).")
@click.option("--resume", is_flag=True,
              help="Continue the interrupted run that wrote --out (the same settings), from its best eval point.")
@click.option("--json", "as_json", is_flag=True, help="Print the run's summary as one JSON object.")
def train(out_path: Path, text_path: Path | None, n_layer: int, n_head: int, n_embd: int, block_size: int,
          max_iters: int, batch_size: int, lr: float, warmup: int, eval_interval: int, seed: int, threads: int,
          overwrite: bool, resume: bool, as_json: bool) -> None:
    """Train a small GPT-2-architecture model on a text file, on the CPU (progress on stderr).

    It ends with the best checkpoint's loss over the whole training text, which for a tiny model
    and a long text can take longer than the training (the 50257-wide head on every token)."""
    from nanoswarm.shards import train as training
    from nanoswarm.shards.model import ModelConfig

    if resume and overwrite:
        raise click.UsageError("--resume continues --out; --overwrite replaces it: give one")
    # Before the next two: they would point to --overwrite or --resume, both refused here (review115).
    if text_path is not None and out_path.exists() and out_path.samefile(text_path):
        raise click.UsageError(f"--out {out_path} is the training text (--text)")
    if resume and not out_path.is_file():
        raise click.ClickException(f"--resume: no checkpoint at {out_path}")
    if out_path.exists() and not (overwrite or resume):
        raise click.ClickException(f"{out_path} exists: pass --resume to continue it or --overwrite to replace it")
    try:  # a shape the options cannot make (n_embd not a multiple of n_head): an option error
        config = ModelConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, gelu="exact")
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    training.check_fits(config, batch_size)
    _check_writable(out_path)
    before = out_path.stat().st_mtime_ns if out_path.exists() else None
    try:
        summary = training.train(text_path or training.DEFAULT_TEXT, out_path, config, max_iters=max_iters,
                                 batch_size=batch_size, lr=lr, warmup=warmup, eval_interval=eval_interval,
                                 seed=seed, threads=threads, resume=resume,
                                 progress=lambda line: click.echo(line, err=True))
    except (KeyboardInterrupt, OSError) as e:
        if not (out_path.is_file() and (resume or out_path.stat().st_mtime_ns != before)):
            raise  # this run wrote no checkpoint: nothing to resume from
        if isinstance(e, KeyboardInterrupt):  # the next step a user takes
            click.echo(f"interrupted: the same command with --resume continues from {out_path}'s eval point",
                       err=True)
            raise
        # a full disk at a later eval point: the best one so far is kept
        raise click.ClickException(f"{e}; {out_path} holds the best eval point so far: the same command "
                                   "with --resume continues from it") from None
    if as_json:
        click.echo(json.dumps({k: v for k, v in summary.items() if k != "history"}))
    else:
        click.echo(f"{summary['out_path']}: {summary['n_params']:,} parameters, validation loss "
                   f"{summary['val_loss']:.4f} (unigram {summary['unigram_val_loss']:.4f})")
