"""Training, evaluation and checkpoints.

`train` runs AdamW with gradient clipping and a warm-up + cosine learning-rate schedule, showing
a tqdm bar with the loss and tokens/s on stderr when it is a terminal (none in a log file); `amp=torch.bfloat16` or `torch.float16` trains under
torch.autocast (float16 with a GradScaler). It takes the model as given, so a model wrapped in
`torch.nn.parallel.DistributedDataParallel` trains the same way (each rank feeding its own
batches). Checkpoints hold the model's weights and config and both vocabularies, and reload
into a model that decodes the same.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import Batch, Pair, Vocab, batches
from .decoding import decode
from .models import Seq2Seq, sequence_loss


@dataclass
class TrainResult:
    losses: List[float] = field(default_factory=list)  # per step
    seconds: float = 0.0
    tokens: int = 0  # source + target tokens seen (this process)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def warmup_cosine(step: int, total: int, warmup: int, final: float = 0.1) -> float:
    """Learning-rate factor: linear warm-up over `warmup` steps, then cosine down to `final`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


def _no_bar(progress: bool) -> bool:
    """tqdm's `disable`. In a terminal tqdm redraws its bar in place; written to a file (CI, a
    log) the redraws pile up into one long line: no bar there. (In a notebook tqdm.auto draws a
    widget instead, whatever the streams are.)"""
    in_notebook = any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__)
    return not progress or not (in_notebook or sys.stderr.isatty())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(model: nn.Module, batches: Iterator[Batch], steps: int, lr: float = 3e-3, weight_decay: float = 0.01,
          clip: float = 1.0, warmup: Optional[int] = None, device=None, progress: bool = True,
          desc: str = "train", amp: Optional[torch.dtype] = None) -> TrainResult:
    """Train `model` (a Seq2Seq, possibly wrapped in DDP) for `steps` batches from `batches`.

    Loss: mean cross-entropy over real target tokens, teacher forcing. Gradients are clipped to
    total norm `clip` (None: no clipping). `warmup` defaults to 5% of the steps. `amp`: None
    (the parameters' dtype), torch.bfloat16 or torch.float16 (mixed precision: autocast, float32
    parameters, and for float16 a GradScaler against underflowing gradients).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if amp not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"amp must be None, torch.bfloat16 or torch.float16, got {amp!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    warmup = max(1, steps // 20) if warmup is None else warmup
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, steps, warmup))
    result = TrainResult()
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=_no_bar(progress), dynamic_ncols=True)
    _sync(device)
    start = time.perf_counter()
    smoothed = None
    for step in bar:
        batch = next(batches).to(device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = sequence_loss(model(batch.src, batch.src_lengths, batch.tgt_in), batch.tgt_out)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip is not None:
            scaler.unscale_(optimizer)  # clip the true gradients
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(optimizer)  # skipped by the scaler when a float16 gradient overflowed
        scaler.update()
        schedule.step()
        value = loss.item()
        result.losses.append(value)
        result.tokens += batch.num_src_tokens + batch.num_tgt_tokens
        smoothed = value if smoothed is None else 0.9 * smoothed + 0.1 * value
        if step % 10 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{smoothed:.3f}", tok_s=f"{result.tokens / max(elapsed, 1e-9):,.0f}")
    _sync(device)
    result.seconds = time.perf_counter() - start
    return result


@dataclass
class EvalResult:
    accuracy: float  # exact match
    predictions: List[str]
    seconds: float
    tokens: int  # generated tokens

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@torch.no_grad()
def evaluate(model: Seq2Seq, pairs: Sequence[Pair], src_vocab: Vocab, tgt_vocab: Vocab, beam_size: int = 1,
             batch_size: int = 256, progress: bool = False, **decode_kwargs) -> EvalResult:
    """Exact-match accuracy of decoding every source of `pairs`, and the decoding speed."""
    if len(pairs) == 0:
        raise ValueError("pairs must not be empty")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    predictions: List[str] = []
    tokens = 0
    _sync(device)
    start = time.perf_counter()
    try:
        for batch in tqdm(batches(pairs, src_vocab, tgt_vocab, batch_size), desc="decode", disable=_no_bar(progress),
                          total=math.ceil(len(pairs) / batch_size), leave=False):
            hyp = decode(model, batch.src.to(device), batch.src_lengths.to(device), beam_size, **decode_kwargs)
            tokens += int(hyp.lengths.sum())
            predictions += [tgt_vocab.decode(row) for row in hyp.tokens.tolist()]
    finally:
        model.train(was_training)
    _sync(device)
    seconds = time.perf_counter() - start
    correct = sum(p == t for p, (_, t) in zip(predictions, pairs))
    return EvalResult(correct / len(pairs), predictions, seconds, tokens)


# ------------------------------------------------------------------------------ checkpoints


def save_checkpoint(path: str, model: Seq2Seq, src_vocab: Vocab, tgt_vocab: Vocab, **extra) -> None:
    """Write model weights + config, both vocabularies and any `extra` (picklable) to `path`."""
    model = getattr(model, "module", model)  # unwrap DDP
    if not isinstance(model, Seq2Seq):
        raise TypeError(f"model must be a Seq2Seq, got {type(model).__name__}")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"config": model.config, "model": state, "src_vocab": src_vocab.to_dict(),
                "tgt_vocab": tgt_vocab.to_dict(), "extra": extra}, path)


@dataclass
class Checkpoint:
    model: Seq2Seq
    src_vocab: Vocab
    tgt_vocab: Vocab
    extra: Dict


def load_checkpoint(path: str, device="cpu", backend: Optional[str] = None) -> Checkpoint:
    """Rebuild the model (in eval mode, on `device`) and vocabularies saved by save_checkpoint."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    model = Seq2Seq(**data["config"], backend=backend)
    model.load_state_dict(data["model"])
    return Checkpoint(model.to(device).eval(), Vocab.from_dict(data["src_vocab"]),
                      Vocab.from_dict(data["tgt_vocab"]), data.get("extra", {}))
