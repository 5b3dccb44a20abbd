"""What every training recipe shares: a resumable run folder and the card saved beside a checkpoint.

A run keeps its resolved config, a log of losses and the latest resumable state in a work folder;
when it finishes it writes the weights (a plain state_dict, loadable by the registry and by the
official code) and a JSON card next to them: config, seed, steps, wall time, final losses, digest.
A finished checkpoint is never overwritten, and an interrupted run resumes from its last state.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from errors import UserError
from lwgan_models.registry import REPO_ROOT

RUNS_DIR = REPO_ROOT / "build" / "runs"


_ARRAY = "__numpy_array__"


def to_plain(value):
    """`value` with numpy arrays and scalars (numpy's RNG state, say) as tensors and Python numbers, so
    that `torch.load(weights_only=True)`, which unpickles no arbitrary objects, can read it back."""
    if isinstance(value, np.ndarray):
        wide = value.astype(np.int64 if value.dtype.kind in "uib" else np.float64)
        return {_ARRAY: torch.from_numpy(wide), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: to_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_plain(item) for item in value)
    return value


def from_plain(value):
    """The inverse of `to_plain`."""
    if isinstance(value, dict):
        if _ARRAY in value:
            return value[_ARRAY].numpy().astype(value["dtype"])
        return {key: from_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(from_plain(item) for item in value)
    return value


def card_path(checkpoint: Path) -> Path:
    """The card that describes `checkpoint` (same stem, `.json`)."""
    return checkpoint.with_suffix(".json")


def read_card(checkpoint: Path) -> dict:
    path = card_path(checkpoint)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"checkpoint card {path} is missing; every shipped checkpoint has one") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"checkpoint card {path} is not valid JSON ({exc})") from exc


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def atomic_write_bytes(path: Path, write) -> None:
    """Write through a temporary sibling and rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


class TrainingRun:
    """A resumable training run that ends in `final_checkpoint` and its card.

    `config` must be JSON-serialisable and hold everything that shapes the result (it is
    compared on resume: a changed config is an error, not a silent mix of two runs).
    """

    def __init__(self, name: str, config: dict, final_checkpoint: Path, work_dir: Path | None = None):
        self.name = name
        self.config = config
        self.final_checkpoint = Path(final_checkpoint)
        self.work_dir = Path(work_dir) if work_dir is not None else RUNS_DIR / name
        self._started_at = time.perf_counter()
        self._wall_time_before = 0.0

    @property
    def state_path(self) -> Path:
        return self.work_dir / "state.pt"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "log.jsonl"

    def start(self) -> dict | None:
        """Check the run may proceed; returns the saved state to resume from, or None for a fresh run."""
        if self.final_checkpoint.exists():
            raise UserError(
                f"{self.final_checkpoint} already holds a finished run; choose another output path "
                "(finished checkpoints are never overwritten)"
            )
        config_path = self.work_dir / "config.json"
        if config_path.exists():
            saved = json.loads(config_path.read_text(encoding="utf-8"))
            if saved != self.config:
                changed = sorted(k for k in set(saved) | set(self.config) if saved.get(k) != self.config.get(k))
                raise UserError(
                    f"{self.work_dir} holds a run with a different config (changed: {', '.join(changed)}); "
                    "remove that folder or pick another work folder"
                )
        else:
            write_json(config_path, self.config)
        if not self.state_path.exists():
            return None
        try:  # weights_only: a state file planted in build/runs/ must not run code on `invoke train`
            state = from_plain(torch.load(self.state_path, map_location="cpu", weights_only=True))
        except Exception as exc:  # a truncated or foreign pickle raises many exception types
            raise UserError(f"resume state {self.state_path} is unreadable or not a training state "
                            f"({type(exc).__name__}); remove it to start over") from exc
        self._wall_time_before = float(state.get("wall_time_s", 0.0))
        print(f"[{self.name}] resuming from step {state.get('step')} ({self.state_path})", flush=True)
        return state

    def wall_time_s(self) -> float:
        """Training time across resumes."""
        return self._wall_time_before + time.perf_counter() - self._started_at

    def save_state(self, state: dict) -> None:
        state = to_plain({**state, "wall_time_s": self.wall_time_s()})
        atomic_write_bytes(self.state_path, lambda tmp: torch.save(state, tmp))

    def log(self, step: int, total_steps: int, losses: dict[str, float]) -> None:
        """Append one line of losses and show progress."""
        entry = {"step": step, "wall_time_s": round(self.wall_time_s(), 2), **losses}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        shown = " ".join(f"{k}={v:.4g}" for k, v in losses.items())
        print(f"[{self.name}] step {step}/{total_steps} {shown} ({entry['wall_time_s']:.0f} s)", flush=True)

    def history(self) -> list[dict]:
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text(encoding="utf-8").splitlines() if line]

    def finish(self, weights: dict[str, torch.Tensor], card: dict) -> Path:
        """Write the final state_dict and its card; the resumable state is dropped."""
        atomic_write_bytes(self.final_checkpoint, lambda tmp: torch.save(weights, tmp))
        full_card = {
            "name": self.name,
            "config": self.config,
            "wall_time_s": round(self.wall_time_s(), 1),
            "sha256": file_sha256(self.final_checkpoint),
            "torch_version": torch.__version__,
            "machine": platform.machine(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **card,
        }
        write_json(card_path(self.final_checkpoint), full_card)
        self.state_path.unlink(missing_ok=True)
        print(f"[{self.name}] wrote {self.final_checkpoint}", flush=True)
        return self.final_checkpoint


def final_losses(history: list[dict], last: int = 10) -> dict[str, float]:
    """Mean of each loss over the last `last` logged steps (one step is too noisy to report)."""
    tail = history[-last:]
    keys = [k for k in (tail[0] if tail else {}) if k not in ("step", "wall_time_s")]
    return {k: round(sum(e[k] for e in tail) / len(tail), 6) for k in keys}
