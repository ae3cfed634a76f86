"""The training script: a short real run writes a checkpoint the sharding command accepts."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

from nanoswarm.shards import train
from nanoswarm.shards.cut import write_model_dir
from nanoswarm.shards.loaders import load_checkpoint
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
    lines: list[str] = []
    summary = train.train(text, ckpt, config, max_iters=30, batch_size=8, lr=3e-3, warmup=5,
                          eval_interval=10, eval_iters=1, seed=0, threads=1, progress=lines.append)
    assert sum(line.startswith("iter ") and "| eval: " in line for line in lines) == 4  # iters 0, 10, 20, 30
    assert lines[-1].startswith("done in ") and str(ckpt) in lines[-1]
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


def test_an_interrupted_run_resumes_to_the_same_model(tmp_path, monkeypatch, caplog):
    """Killed after its eval at iteration 4 wrote a checkpoint, a run resumed from that checkpoint
    ends with the weights an uninterrupted run ends with, exactly; other settings are refused."""
    import pytest

    text = tmp_path / "text.txt"
    text.write_text(train.DEFAULT_TEXT.read_text()[:20_000])
    config = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, gelu="exact")
    kwargs = dict(max_iters=8, batch_size=4, lr=3e-3, warmup=2, eval_interval=2, eval_iters=1, seed=0,
                  threads=1)
    whole = train.train(text, tmp_path / "whole.pt", config, **kwargs)

    real_loss, steps = train.training_loss, []

    def dies_at_iteration_5(*args):
        steps.append(1)
        if len(steps) == 6:  # the step of iteration 5, after iteration 4's checkpoint
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(train, "training_loss", dies_at_iteration_5)
    with pytest.raises(KeyboardInterrupt):
        train.train(text, tmp_path / "cut.pt", config, **kwargs)
    monkeypatch.setattr(train, "training_loss", real_loss)
    assert torch.load(tmp_path / "cut.pt", weights_only=True)["iter_num"] == 4
    (tmp_path / "other.pt").write_bytes((tmp_path / "cut.pt").read_bytes())
    with pytest.raises(ValueError, match=r"other settings: lr \(0.003 there, 0.001 now\), min_lr"):
        train.train(text, tmp_path / "cut.pt", config, **{**kwargs, "lr": 1e-3}, resume=True)
    wider = dataclasses.replace(config, n_embd=2 * config.n_embd)  # both shapes named (review207: the old only)
    shapes = rf"model shape \(.*n_embd={config.n_embd}.* there, .*n_embd={wider.n_embd}.* now\)"
    with pytest.raises(ValueError, match=shapes):
        train.train(text, tmp_path / "cut.pt", wider, **kwargs, resume=True)
    original = text.read_text()
    text.write_text(original[::-1])  # the same path, other text
    with pytest.raises(ValueError, match="other settings: text_sha256"):
        train.train(text, tmp_path / "cut.pt", config, **kwargs, resume=True)
    text.write_text(original)
    # the same text under another path (or the same path from elsewhere) is the same run
    elsewhere = tmp_path / "copy of the text.txt"
    elsewhere.write_text(original)
    resumed = train.train(elsewhere, tmp_path / "cut.pt", config, **kwargs, resume=True)
    assert resumed["resumed_from"] == 4 and resumed["best_iter"] == whole["best_iter"]
    assert resumed["history"] == [{**h, "elapsed_s": r["elapsed_s"]} for h, r in zip(whole["history"],
                                                                                      resumed["history"])]
    # Another thread count is allowed, and said to maybe change the last bits (review81).
    with caplog.at_level("WARNING", logger="nanoswarm.shards"):
        train.train(text, tmp_path / "other.pt", config, **{**kwargs, "threads": 2}, resume=True)
    assert "resuming with 2 threads where the run had 1" in caplog.text
    a, b = load_checkpoint(tmp_path / "whole.pt")[1], load_checkpoint(tmp_path / "cut.pt")[1]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_progress_is_a_callable_or_none(tmp_path):
    """`progress` was a flag once: a bool is refused before any work, not at the first line."""
    with pytest.raises(TypeError, match="progress must be a callable"):
        train.train(tmp_path / "no-text.txt", tmp_path / "ckpt.pt", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_run_that_cannot_fit_or_write_fails_before_any_work(tmp_path):
    """A review's runs allocated for 25-87 s before torch failed (n_layer 100000, batch 10^8), or
    failed at the first eval with torch's words for a bad --out; a shape `shard` refuses trained."""
    from conftest import invoke_cli

    args = ["train", "--n-layer", "1", "--n-head", "1", "--n-embd", "8", "--block-size", "8", "--max-iters", "2"]
    for more, why in ((["--n-embd", "100000", "--n-head", "1"], "n_embd 100000 is above the limit 65536"),
                      (["--n-layer", "1025"], "n_layer 1025 is above the limit 1024"),
                      (["--batch-size", "100000000"], "training this model needs about")):
        out = invoke_cli(*args, *more, "--out", str(tmp_path / "a.pt"))
        assert out.returncode == 1 and why in out.stderr.strip().splitlines()[-1], out.stderr
    (tmp_path / "file").write_text("")
    out = invoke_cli(*args, "--out", str(tmp_path / "file" / "ckpt.pt"))
    assert out.returncode == 1 and out.stderr.strip() == (f"error: --out {tmp_path / 'file' / 'ckpt.pt'}: "
                                                          f"{tmp_path / 'file'} is not a directory")
    out = invoke_cli(*args, "--n-layer", "1025", "--out", str(tmp_path / "new" / "sub" / "ckpt.pt"))
    assert out.returncode == 1 and "n_layer 1025" in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no directory made, no probe left


def test_bad_train_options_and_texts_are_refused_in_one_line(tmp_path):
    """Review77: --out dir/ wrote a file named dir; --lr 1e300 failed in torch's optimizer after
    the first checkpoint; a FIFO as --text hung and /dev/zero filled memory; --out the --text
    replaced the text with a checkpoint."""
    from conftest import invoke_cli

    args = ["train", "--n-layer", "1", "--n-head", "1", "--n-embd", "8", "--block-size", "8", "--max-iters", "1"]
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 20)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for more, code, why in (
            (["--out", f"{tmp_path / 'dir'}/"], 2, "names a directory, not a file"),
            (["--out", ""], 2, "an empty path names no file"),
            (["--lr", "1e300"], 2, "'1e300' is too large: at most 1"),
            (["--n-embd", "7", "--n-head", "2"], 2, "n_embd 7 is not divisible by n_head 2"),
            (["--text", str(fifo)], 1, f"{fifo}: cannot read it as training text: not a regular file"),
            (["--text", "/dev/zero"], 1, "/dev/zero: cannot read it as training text: not a regular file"),
            (["--text", str(text), "--out", str(text), "--overwrite"], 2, "is the training text (--text)"),
            # not "exists: pass --resume ... or --overwrite", both refused then (review115)
            (["--text", str(text), "--out", str(text)], 2, "is the training text (--text)")):
        if "--out" not in more:
            more = [*more, "--out", str(tmp_path / "ckpt.pt")]
        out = invoke_cli(*args, *more)
        assert out.returncode == code and why in out.stderr.strip().splitlines()[-1], (more, out.stderr)
    assert text.read_text().startswith("To be")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "text.txt"]


def test_a_run_whose_loss_diverges_says_so(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(train.DEFAULT_TEXT.read_text()[:20_000])
    config = ModelConfig(n_layer=1, n_head=1, n_embd=16, block_size=16, gelu="exact")
    with pytest.raises(train.TrainingDiverged, match=r"validation loss nan at iter 2; start afresh with --overwrite "
                                                     r"and a lower --lr \(.* holds the best eval point, iter 0"):
        train.train(text, tmp_path / "ckpt.pt", config, max_iters=400, batch_size=2, lr=1e30, warmup=0,
                    eval_interval=2, eval_iters=1, seed=0)  # (stops at once, not at 400)
    assert (tmp_path / "ckpt.pt").exists()


def test_an_interrupted_run_says_how_to_continue(tmp_path, monkeypatch):
    from conftest import invoke_cli

    def interrupted(text_path, out_path, *args, **kwargs):
        out_path.write_bytes(b"a checkpoint")  # its first eval point was written
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train", interrupted)
    out = invoke_cli("train", "--out", str(tmp_path / "ckpt.pt"))
    assert out.returncode == 130
    assert out.stderr.strip() == (f"interrupted: the same command with --resume continues from {tmp_path / 'ckpt.pt'}"
                                  "'s eval point")

    def interrupted_at_once(*args, **kwargs):
        raise KeyboardInterrupt

    # --overwrite, stopped before its first eval: the file is the earlier run's, not one to resume
    monkeypatch.setattr(train, "train", interrupted_at_once)
    out = invoke_cli("train", "--out", str(tmp_path / "ckpt.pt"), "--overwrite")
    assert out.returncode == 130 and out.stderr == ""


def test_a_full_disk_keeps_the_best_checkpoint_and_says_how_to_go_on(tmp_path, monkeypatch):
    """A full disk at a later eval point printed torch's "[enforce fail at inline_container.cc]
    ... unexpected pos" and left a hidden partial file filling the disk (a review). The error now
    names the checkpoint and the reason, the partial file is gone, the best eval point so far
    stays, and the line says that --resume continues from it."""
    from pathlib import Path

    from conftest import invoke_cli

    text = tmp_path / "text.txt"
    text.write_text(train.DEFAULT_TEXT.read_text()[:20_000])
    out = tmp_path / "ckpt.pt"
    real, saves = Path.write_bytes, []

    def write_bytes(self, data):
        if self.name == ".ckpt.pt.tmp":
            saves.append(self)
            if len(saves) == 2:
                raise OSError(28, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    done = invoke_cli("train", "--text", str(text), "--out", str(out), "--n-layer", "1", "--n-head", "1",
                      "--n-embd", "16", "--block-size", "16", "--max-iters", "4", "--batch-size", "2",
                      "--eval-interval", "1", "--warmup", "0")
    assert len(saves) == 2 and done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: cannot write checkpoint {out}: No space left on device; {out} holds the best eval point so far: "
        "the same command with --resume continues from it")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "text.txt"]
    monkeypatch.setattr(Path, "write_bytes", real)
    done = invoke_cli("train", "--text", str(text), "--out", str(out), "--n-layer", "1", "--n-head", "1",
                      "--n-embd", "16", "--block-size", "16", "--max-iters", "4", "--batch-size", "2",
                      "--eval-interval", "1", "--warmup", "0", "--resume")
    assert done.returncode == 0, done.stderr


def test_a_resumed_run_interrupted_before_its_next_eval_point_says_how_to_continue(tmp_path, monkeypatch):
    """--resume stopped before it wrote anything: the checkpoint it resumed from is still there to
    resume from, so the line says so (as for a fresh run stopped after its first eval point)."""
    from conftest import invoke_cli

    out_path = tmp_path / "ckpt.pt"
    out_path.write_bytes(b"an earlier run's eval point")

    def interrupted_at_once(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train", interrupted_at_once)
    out = invoke_cli("train", "--out", str(out_path), "--resume")
    assert out.returncode == 130
    assert out.stderr.strip() == f"interrupted: the same command with --resume continues from {out_path}'s eval point"
    assert out_path.read_bytes() == b"an earlier run's eval point"


def test_resume_and_overwrite_together_are_refused_before_any_work(tmp_path):
    """--resume continues --out and --overwrite replaces it: given both, neither is guessed."""
    from conftest import invoke_cli

    out_path = tmp_path / "ckpt.pt"
    out_path.write_bytes(b"an earlier run's eval point")
    out = invoke_cli("train", "--out", str(out_path), "--resume", "--overwrite", "--max-iters", "1")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == "error: --resume continues --out; --overwrite replaces it: give one"
    assert out_path.read_bytes() == b"an earlier run's eval point"


def test_resume_without_a_checkpoint_is_refused_in_one_line(tmp_path):
    """--resume of an --out that does not exist (a typo, another directory) says so at once."""
    from conftest import invoke_cli

    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 20)
    out = invoke_cli("train", "--text", str(text), "--out", str(tmp_path / "ckpt.pt"), "--resume", "--n-layer", "1",
                     "--n-head", "1", "--n-embd", "8", "--block-size", "8", "--max-iters", "1")
    assert out.returncode == 1
    assert out.stderr.strip() == f"error: --resume: no checkpoint at {tmp_path / 'ckpt.pt'}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.txt"]


def test_a_training_split_of_exactly_one_window_is_too_few(tmp_path):
    """A window and its shifted targets need block_size + 1 training tokens: a split of exactly
    block_size is refused by name before the model is built (torch's randint failed at the first
    eval point otherwise), and one token more trains."""
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 8)
    n_train = len(train.split_ids(train.tokenize_file(text), 0.1)[0])
    for block_size, fits in ((n_train, False), (n_train - 1, True)):
        config = ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=block_size, gelu="exact")
        args = (text, tmp_path / "ckpt.pt", config)
        kwargs = {"max_iters": 0, "batch_size": 1, "eval_iters": 1, "seed": 0, "progress": lambda line: None}
        if fits:
            assert train.train(*args, **kwargs)["best_iter"] == 0
        else:
            with pytest.raises(ValueError, match=f"tokens are too few for block_size {n_train}$"):
                train.train(*args, **kwargs)
            assert not (tmp_path / "ckpt.pt").exists()


def test_a_model_past_this_machines_memory_is_refused_before_any_work(tmp_path, monkeypatch):
    """The memory check compares the run's estimate with the memory the machine reports (here a
    machine of 64 MiB: a 128-wide model's weights and AdamW state alone take more)."""
    from conftest import invoke_cli

    real = os.sysconf
    monkeypatch.setattr(train.os, "sysconf", lambda name: {"SC_PHYS_PAGES": 16384, "SC_PAGE_SIZE": 4096}.get(
        name) or real(name))
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 20)
    config = ModelConfig(n_layer=1, n_head=1, n_embd=128, block_size=8, gelu="exact")
    assert 64 * 2**20 < train.training_bytes(config, 1) < 2 * 64 * 2**20  # just past it, not by far
    out = invoke_cli("train", "--text", str(text), "--out", str(tmp_path / "ckpt.pt"), "--n-layer", "1", "--n-head",
                     "1", "--n-embd", "128", "--block-size", "8", "--batch-size", "1", "--max-iters", "0")
    assert out.returncode == 1 and "training this model needs about" in out.stderr.strip().splitlines()[-1]
    assert "more than this machine's 0.1 GiB" in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.txt"]


def test_the_summary_reports_the_checkpoint_written_not_the_last_iterate(tmp_path):
    """A run whose last eval point is worse than an earlier one (lr 1 overshoots): --out holds the
    best eval point, and the summary's train loss is that checkpoint's, not the last weights'."""
    text = tmp_path / "text.txt"
    text.write_text(train.DEFAULT_TEXT.read_text()[:20_000])
    config = ModelConfig(n_layer=1, n_head=1, n_embd=16, block_size=16, gelu="exact")
    ckpt = tmp_path / "ckpt.pt"
    summary = train.train(text, ckpt, config, max_iters=4, batch_size=2, lr=1.0, warmup=0, eval_interval=2,
                          eval_iters=1, seed=0, progress=lambda line: None)
    history = [h["val_loss"] for h in summary["history"]]
    assert summary["best_iter"] == 0 and history[-1] > history[0] + 1.0  # the last iterate is not the best
    assert summary["val_loss"] == history[0]
    loaded_config, state = load_checkpoint(ckpt)
    write_model_dir(loaded_config, state, tmp_path / "model", 1, progress=False)
    train_ids = train.split_ids(train.tokenize_file(text), 0.1)[0]
    with torch.inference_mode():
        written = train.eval_loss(load_model(tmp_path / "model"), train_ids, config.block_size)
    assert summary["train_loss"] == pytest.approx(written, rel=1e-5)


def test_the_fused_head_loss_is_cross_entropys_value_and_gradients():
    """training_loss against F.cross_entropy(model(x), y) over more tokens than one chunk (a partial
    last chunk too): the same loss and the same gradient of every weight, scaled as the loss is
    (review220: a gradient n times too large, or one ignoring the loss's scale, passed every test:
    Adam and the gradient clipping hid them)."""
    import torch.nn.functional as F

    from nanoswarm.shards.head_loss import HEAD_CHUNK, training_loss
    from nanoswarm.shards.model import GPT

    config = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, gelu="exact")
    torch.manual_seed(0)
    model = GPT(config)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 50257, (3, 50), generator=g), torch.randint(0, 50257, (3, 50), generator=g)
    assert HEAD_CHUNK < x.numel() and x.numel() % HEAD_CHUNK

    def grads(loss_fn):
        model.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    want, want_grads = grads(lambda: F.cross_entropy(model(x).reshape(-1, 50257), y.reshape(-1)))
    got, got_grads = grads(lambda: training_loss(model, x, y))
    assert abs(got - want) < 1e-5 and got_grads.keys() == want_grads.keys()
    for k in want_grads:
        assert torch.allclose(got_grads[k], want_grads[k], rtol=1e-4, atol=1e-7), k
    _, doubled = grads(lambda: 2 * training_loss(model, x, y))
    assert all(torch.allclose(doubled[k], 2 * want_grads[k], rtol=1e-4, atol=1e-7) for k in want_grads)


def test_resume_refuses_a_checkpoint_without_optimizer_state_and_resumes_one_from_before_text_hashes(
        tmp_path, caplog):
    """A checkpoint with weights and eval point but no optimizer or generator state is not one to
    resume (it said so; review220: a KeyError when that check lost its optimizer); one from
    before texts were hashed resumes, with a warning, from the same --text path only."""
    from nanoswarm.shards.loaders import CheckpointError
    from nanoswarm.shards.model import GPT
    from nanoswarm.shards.train_checkpoint import resume_run, save_eval_point
    from nanoswarm.shards.writers import save_nanogpt_checkpoint

    config = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, gelu="exact")
    torch.manual_seed(0)
    model = GPT(config)
    optimizer, generator = torch.optim.AdamW(model.parameters(), lr=1e-3), torch.Generator().manual_seed(5)
    settings = {"text_path": "a.txt", "text_sha256": "ab" * 32, "lr": 1e-3, "threads": 1}
    bare = tmp_path / "bare.pt"
    save_nanogpt_checkpoint(config, model.flat_state_dict(), bare,
                            extra={"iter_num": 2, "best_val_loss": 1.5, "config": settings})
    with pytest.raises(CheckpointError, match="not a checkpoint `nanoswarm train` can resume"):
        resume_run(bare, model, optimizer, generator, settings)

    old = tmp_path / "old.pt"
    unhashed = {k: v for k, v in settings.items() if k != "text_sha256"}
    saved_state = generator.get_state()
    save_eval_point(model, old, 2, 1.5, unhashed, optimizer, generator, [{"iter": 0, "val_loss": 2.0}])
    generator.manual_seed(99)
    with caplog.at_level("WARNING", logger="nanoswarm.shards"):
        assert resume_run(old, model, optimizer, generator, settings) == (2, 1.5, [{"iter": 0, "val_loss": 2.0}])
    assert "predates text hashing" in caplog.text and torch.equal(generator.get_state(), saved_state)
    with pytest.raises(ValueError, match=r"other settings: text_path \('a.txt' there, 'b.txt' now\)"):
        resume_run(old, model, optimizer, generator, {**settings, "text_path": "b.txt"})
