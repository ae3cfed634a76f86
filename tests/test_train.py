"""The training script: a short real run writes a checkpoint the sharding command accepts."""

from __future__ import annotations

import math

import torch

from nanoswarm.shards import train
from nanoswarm.shards.loaders import load_checkpoint
from nanoswarm.shards.manifest import write_model_dir
from nanoswarm.shards.model import ModelConfig
from nanoswarm.shards.weights import load_model


def test_unigram_baseline_by_hand():
    train_ids = torch.tensor([0, 0, 1])
    val_ids = torch.tensor([0, 2])
    # add-one counts over a vocabulary of 3: [3, 2, 1] / 6
    want = -(math.log(3 / 6) + math.log(1 / 6)) / 2
    assert abs(train.unigram_val_loss(train_ids, val_ids, 3) - want) < 1e-12


def test_short_training_run_learns_and_shards(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(train.DEFAULT_TEXT.read_text()[:40_000])
    config = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, gelu="exact")
    ckpt = tmp_path / "ckpt.pt"
    summary = train.train(text, ckpt, config, max_iters=30, batch_size=8, lr=3e-3, warmup=5,
                          eval_interval=10, eval_iters=1, seed=0, threads=1, progress=False)
    history = [h["val_loss"] for h in summary["history"]]
    assert history[-1] < history[0] - 1.0  # it learned something from the text
    loaded_config, state = load_checkpoint(ckpt)
    assert loaded_config == config
    write_model_dir(loaded_config, state, tmp_path / "model", 1, progress=False)
    model = load_model(tmp_path / "model")
    ids = train.tokenize_file(text)[:64]
    with torch.inference_mode():
        loss = train.eval_loss(model, ids, config.block_size)
    assert math.isfinite(loss)
